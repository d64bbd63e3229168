"""The scheduler process: `python -m scheduler` (the Procfile's `scheduler`)."""
from scheduler.main import main

main()
