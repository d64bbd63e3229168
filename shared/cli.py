"""The `steprun` command."""
from __future__ import annotations

import os
import sys
import threading

import click

from shared.settings import Settings, documented_settings


def _settings() -> Settings:
    return Settings.from_env()


@click.group()
def main() -> None:
    """steprun: the runtime layer for AI agents."""


@main.command()
def migrate() -> None:
    """Bring the database schema to head."""
    from shared.db import make_engine
    from shared.migrate import upgrade

    settings = _settings()
    engine = make_engine(settings)
    upgrade(engine)
    engine.dispose()
    click.echo(f"database at head ({engine.url.render_as_string(hide_password=True)})")


@main.group()
def keys() -> None:
    """Create API keys."""


@keys.command("create")
@click.option("--tenant", required=True, help="Tenant (application) the key belongs to.")
@click.option("--user", "user_id", help="End user the key acts as.")
@click.option("--service", is_flag=True, help="A service key: acts for any user named in X-User-Id.")
@click.option("--name", help="A label for the key.")
def keys_create(tenant: str, user_id: str | None, service: bool, name: str | None) -> None:
    """Create a key and print it (it is shown only once)."""
    from shared.db import make_engine, make_sessionmaker, unit_of_work
    from shared.keys import create_key

    if bool(user_id) == service:
        raise click.UsageError("give exactly one of --user USER or --service")
    engine = make_engine(_settings())
    with unit_of_work(make_sessionmaker(engine)) as db:
        _, raw = create_key(db, tenant, user_id, name)
    engine.dispose()
    click.echo(raw)


@main.command()
@click.option("--write-readme", type=click.Path(exists=True), help="Rewrite the table in this README.")
def settings(write_readme: str | None) -> None:
    """List every environment variable steprun reads."""
    if write_readme:
        from shared.docs import render_readme

        with open(write_readme) as f:
            text = f.read()
        with open(write_readme, "w") as f:
            f.write(render_readme(text))
        return
    for s in documented_settings():
        click.echo(f"{s.env:34} default={s.default!r:28} {s.help}")


@main.command()
@click.option("--port", type=int, help="Port (default: $PORT or 8000).")
def dev(port: int | None) -> None:
    """Everything in one process on the embedded default (SQLite + in-process queue and bus)."""
    from werkzeug.serving import make_server

    from api.app import create_app
    from shared.db import unit_of_work
    from shared.keys import create_key
    from shared.logs import configure_logging
    from shared.migrate import upgrade
    from shared.recovery import recover_after_restart
    from shared.runtime import Runtime
    from scheduler.main import run_forever

    settings = _settings()
    if port:
        settings = settings.replace(port=port)
    configure_logging(settings)
    rt = Runtime.create(settings)
    upgrade(rt.engine)
    key_file = os.path.join(settings.data_dir, "dev-key")
    if os.path.exists(key_file):
        with open(key_file) as f:
            key = f.read().strip()
    else:
        with unit_of_work(rt.sessions) as db:
            _, key = create_key(db, "dev", "dev", "steprun dev")
        os.makedirs(settings.data_dir, exist_ok=True)
        with open(key_file, "w") as f:
            f.write(key + "\n")
        os.chmod(key_file, 0o600)
    if settings.redis_url is None:
        recover_after_restart(rt)
    app = create_app(settings, runtime=rt)
    server = make_server(settings.host, settings.port, app, threaded=True)
    url = f"http://{settings.host}:{server.server_port}"
    stop = threading.Event()
    threading.Thread(target=run_forever, args=(rt, stop), name="scheduler", daemon=True).start()
    mode = "embedded" if settings.database_url is None else "Postgres"
    click.echo(f"steprun dev ({mode}) serving {url}")
    click.echo(f"dev key: {key}")
    click.echo(f"try: curl -s -H 'Authorization: Bearer {key}' {url}/v1/agents")
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        server.shutdown()
        rt.close()


if __name__ == "__main__":  # pragma: no cover
    main()
