"""The `steprun` command."""
from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from importlib import metadata
from typing import Any

import click

from shared.agent import AgentDefinitionError
from shared.settings import Settings, SettingsError, documented_settings

# Local URLs: `steprun chat` finds the dev key of `steprun dev` for these without --key.
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]", "0.0.0.0")


def _settings() -> Settings:
    return Settings.from_env()


def _version() -> str:
    try:
        return metadata.version("steprun")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a tree that is not installed
        return "unknown"


def _self_command() -> str:
    """How to run this same `steprun` again, pasteable into any shell (the script need not be on PATH)."""
    script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if os.path.basename(script) == "steprun" and os.access(script, os.X_OK):
        found = next((os.path.join(d, "steprun") for d in os.environ.get("PATH", "").split(os.pathsep)
                      if d and os.path.realpath(os.path.join(d, "steprun")) == os.path.realpath(script)), None)
        return "steprun" if found else shlex.quote(script)
    return f"{shlex.quote(sys.executable)} -m steprun"


@click.group()
@click.version_option(_version(), "--version", "-V", prog_name="steprun", message="%(prog)s %(version)s")
def cli() -> None:
    """steprun: the runtime layer for AI agents."""


def main() -> None:
    """The console script: agent modules resolve from the current directory; config errors are one line."""
    # `python -m` and gunicorn put the working directory on the path; a console script does not.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        cli(standalone_mode=True)
    except (AgentDefinitionError, SettingsError) as exc:
        click.echo(f"steprun: configuration error: {exc}", err=True)
        sys.exit(2)


@cli.command()
def migrate() -> None:
    """Bring the database schema to head."""
    from shared.db import make_engine
    from shared.migrate import upgrade

    settings = _settings()
    engine = make_engine(settings)
    upgrade(engine, settings=settings)
    engine.dispose()
    click.echo(f"database at head ({engine.url.render_as_string(hide_password=True)})")


@cli.group()
def keys() -> None:
    """Create API keys."""


@keys.command("create")
@click.option("--tenant", required=True, help="Tenant (application) the key belongs to.")
@click.option("--user", "user_id", help="End user the key acts as.")
@click.option("--service", is_flag=True, help="A service key: acts for any user named in X-User-Id.")
@click.option("--admin", is_flag=True, help="A tenant admin key: signs in to the web console (/console).")
@click.option("--name", help="A label for the key.")
def keys_create(tenant: str, user_id: str | None, service: bool, admin: bool, name: str | None) -> None:
    """Create a key and print it (it is shown only once)."""
    from shared.auth.keys import create_key
    from shared.db import make_engine, make_sessionmaker, unit_of_work

    if [bool(user_id), service, admin].count(True) != 1:
        raise click.UsageError("give exactly one of --user USER, --service or --admin")
    engine = make_engine(_settings())
    with unit_of_work(make_sessionmaker(engine)) as db:
        _, raw = create_key(db, tenant, user_id, name, admin=admin)
    engine.dispose()
    click.echo(raw)


@keys.command("list")
@click.option("--tenant", required=True, help="Tenant whose keys to list.")
def keys_list(tenant: str) -> None:
    """List a tenant's keys (ids and prefixes; the keys themselves are not stored)."""
    from shared.auth.keys import list_keys
    from shared.db import make_engine, make_sessionmaker, unit_of_work

    engine = make_engine(_settings())
    with unit_of_work(make_sessionmaker(engine)) as db:
        for row in list_keys(db, tenant):
            state = f"revoked {row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "live"
            who = row.user_id or ("(admin)" if row.admin else "(service)")
            click.echo(f"{row.id}  {row.prefix}…  {who:24} {state:22} {row.name or ''}")
    engine.dispose()


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by its id (see `keys list`); API processes stop accepting it within STEPRUN_KEY_CACHE_SECONDS."""
    from shared.auth.keys import revoke_key
    from shared.db import make_engine, make_sessionmaker, unit_of_work

    engine = make_engine(_settings())
    with unit_of_work(make_sessionmaker(engine)) as db:
        revoked = revoke_key(db, key_id)
    engine.dispose()
    if not revoked:
        raise click.ClickException(f"no live key {key_id!r}")
    click.echo(f"revoked {key_id}")


@cli.command()
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


@cli.command()
@click.option("--window", type=float, default=60.0, show_default=True,
              help="Seconds of recent first steps the enqueue-to-start p95 covers.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def stats(window: float, as_json: bool) -> None:
    """Queue latency from Postgres: oldest waiting step, waiting/running counts, start-delay p95."""
    import json

    from shared.db import make_engine, make_sessionmaker
    from shared.stats import queue_stats

    settings = _settings()
    engine = make_engine(settings)  # the owner's login: queue figures span every tenant (the system path)
    with make_sessionmaker(engine)() as db:
        figures = queue_stats(db, window).as_dict()
    engine.dispose()
    if as_json:
        click.echo(json.dumps(figures))
        return
    for name, value in figures.items():
        click.echo(f"{name:26} {'-' if value is None else (round(value, 3) if isinstance(value, float) else value)}")


@cli.group()
def users() -> None:
    """Operate on one end user's data."""


@users.command("erase")
@click.option("--tenant", required=True, help="Tenant the user belongs to.")
@click.option("--user", "user_id", required=True, help="The user whose data is erased.")
def users_erase(tenant: str, user_id: str) -> None:
    """Erase everything of one user: sessions with their history, traces and event logs, memory, own documents."""
    from shared.auth.principal import Principal
    from shared.db import unit_of_work
    from shared.engine.step import build_runtime
    from shared.turns.history import erase_user

    rt = build_runtime(_settings())
    try:
        who = Principal(tenant, user_id)
        with unit_of_work(rt.sessions, who) as db:
            report = erase_user(db, rt, who)
    finally:
        rt.close()
    click.echo(" ".join(f"{k}={v}" for k, v in report.as_dict().items()))


def _dev_key_for(url: str) -> str | None:
    """The key `steprun dev` wrote next to us, when ``url`` is local (this machine)."""
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    if host not in {h.strip("[]") for h in LOCAL_HOSTS}:
        return None
    path = os.path.join(_settings().data_dir, "dev-key")
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


@cli.command()
@click.option("--agent", help="Agent to talk to (default: the first one served).")
@click.option("--session", "session_id", help="Continue this session instead of starting one.")
@click.option("--url", envvar="STEPRUN_URL", default="http://127.0.0.1:8000", show_default=True,
              help="The API's base URL (env STEPRUN_URL).")
@click.option("--key", envvar="STEPRUN_KEY",
              help="An API key (env STEPRUN_KEY). For a local URL, the dev key `steprun dev` wrote in "
                   "STEPRUN_DATA_DIR (.steprun/dev-key) is used when none is given.")
def chat(agent: str | None, session_id: str | None, url: str, key: str | None) -> None:
    """Chat with an agent in the terminal: each line is a turn, the answer streams back.

    Ctrl-C cancels the running turn; a second Ctrl-C (or Ctrl-D) quits.
    """
    from steprun.chat import Chat, ChatError

    key = key or _dev_key_for(url)
    if not key:
        raise click.UsageError("give --key KEY (or STEPRUN_KEY); only a local URL next to a .steprun/dev-key "
                               "works without one")
    client = Chat(url, key)
    try:
        client.start(agent, session_id)
        client.run()
    except ChatError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        pass
    finally:
        client.close()


class _DataDirLock:
    """One `steprun dev` per data folder: a second one must not resume (steal) the first one's turns."""

    def __init__(self, data_dir: str):
        self.path = os.path.join(data_dir, "dev.lock")
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise click.ClickException(
                f"another `steprun dev` (pid {holder}) is using {os.path.abspath(os.path.dirname(self.path))}; "
                "stop it, or give this one its own STEPRUN_DATA_DIR") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd  # held (and the lock with it) until the process exits


def _not_ready(environ: Any, start_response: Any) -> list[bytes]:
    """What the bound port answers while the runtime starts (migrations, recovery)."""
    start_response("503 Service Unavailable", [("Content-Type", "application/json"), ("Retry-After", "1")])
    return [b'{"error":{"code":"unavailable","message":"steprun dev is starting"}}']


@cli.command()
@click.option("--port", type=int, help="Port (default: $PORT or 8000).")
def dev(port: int | None) -> None:
    """Everything in one process on the embedded default (SQLite + in-process queue and bus)."""
    import werkzeug.serving
    from werkzeug.serving import make_server

    from api.app import create_app
    from scheduler.main import run_forever
    from shared.agent import AgentRegistry
    from shared.auth.keys import create_key
    from shared.auth.principal import SYSTEM
    from shared.db import make_engine, unit_of_work
    from shared.logs import configure_logging
    from shared.migrate import upgrade
    from shared.turns.recovery import recover_after_restart

    settings = _settings()
    if port:
        settings = settings.replace(port=port)
    # First the data folder's lock, then the port: a second `steprun dev` stops here, before it
    # opens the database or recovers (steals) anything of the first one.
    os.makedirs(settings.data_dir, mode=0o700, exist_ok=True)
    _DataDirLock(settings.data_dir).acquire()
    werkzeug.serving._log_add_style = False  # no colour codes in request log lines (files, JSON)
    try:
        server = make_server(settings.host, settings.port, _not_ready, threaded=True)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc} "
                                   "(use --port or PORT)") from None
    if not settings.secret_key:
        from shared.auth.stream_tokens import dev_secret_key

        # Stream tokens work out of the box in development; production must set STEPRUN_SECRET_KEY.
        settings = settings.replace(secret_key=dev_secret_key(settings.data_dir))
    configure_logging(settings)
    from shared.engine.step import build_runtime

    agents = AgentRegistry.from_module(settings.agents_module)  # a broken agents module: one line, before anything
    upgrade_engine = make_engine(settings)
    upgrade(upgrade_engine, settings=settings)  # before the runtime: it connects as the login this creates
    upgrade_engine.dispose()
    rt = build_runtime(settings, agents=agents, dev=True)
    key_file = os.path.join(settings.data_dir, "dev-key")
    if os.path.exists(key_file):
        with open(key_file) as f:
            key = f.read().strip()
    else:
        with unit_of_work(rt.sessions, SYSTEM) as db:  # keys: the system path
            _, key = create_key(db, "dev", "dev", "steprun dev")
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
    beat = None
    if settings.redis_url is None:
        from shared.fleet import WorkerBeat

        recover_after_restart(rt)
        beat = WorkerBeat(rt).start()  # this process runs the steps: it is the worker the console lists
    server.app = create_app(settings, runtime=rt)
    url = f"http://{settings.host}:{server.server_port}"
    stop = threading.Event()
    threading.Thread(target=run_forever, args=(rt, stop), name="scheduler", daemon=True).start()
    mode = "embedded" if settings.database_url is None else "Postgres"
    agent = "math" if rt.agents.get("math") else next((a.name for a in rt.agents), "")
    me = _self_command()
    default_url = url == "http://127.0.0.1:8000"
    click.echo(f"steprun dev ({mode}) serving {url}")
    click.echo(f"dev key: {key}")
    click.echo(f"try: curl -s -H 'Authorization: Bearer {key}' {url}/v1/agents")
    # Pasteable as is: the full path when `steprun` is not on PATH; the key is found in .steprun/ (cwd).
    options = ([] if default_url else ["--url", url]) + (
        [] if settings.data_dir == ".steprun" else ["--key", key]) + (["--agent", agent] if agent else [])
    click.echo(f"chat: {' '.join([me, 'chat', *options])}")
    sys.stdout.flush()

    def _terminate(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        server.server_close()
        if beat is not None:
            beat.stop()
        rt.close()


@cli.command()
@click.option("--workers", type=int, default=1, show_default=True, help="Celery worker processes.")
@click.option("--web-workers", type=int, default=None,
              help="gunicorn worker processes (default: WEB_CONCURRENCY or 2).")
@click.option("--no-migrate", is_flag=True, help="Do not bring the schema to head first.")
def start(workers: int, web_workers: int | None, no_migrate: bool) -> None:
    """Run the production shape locally: web, worker(s) and scheduler, each its own process.

    Needs DATABASE_URL, REDIS_URL and STEPRUN_SECRET_KEY (as a deployment does). Each line of output is
    prefixed with its process; when one process exits, or on Ctrl-C / SIGTERM, all are stopped.
    """
    from steprun.start import run_processes

    settings = _settings()
    settings.check_deployment("web")
    sys.exit(run_processes(settings, workers=workers, web_workers=web_workers, migrate=not no_migrate))


if __name__ == "__main__":  # pragma: no cover
    main()
