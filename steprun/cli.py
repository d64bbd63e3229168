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
@click.option("--window", type=float, default=60.0, show_default=True,
              help="Seconds of recent first steps the enqueue-to-start p95 covers.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def stats(window: float, as_json: bool) -> None:
    """Queue latency from Postgres: oldest waiting step, waiting/running counts, start-delay p95."""
    import json

    from shared.auth.principal import SYSTEM
    from shared.db import install_row_security, make_engine, make_sessionmaker, set_scope
    from shared.stats import queue_stats

    settings = _settings()
    engine = make_engine(settings)
    factory = make_sessionmaker(engine)
    install_row_security(factory, None if settings.db_role == "none" else settings.db_role)
    with factory() as db:
        set_scope(db, SYSTEM)  # queue figures span every tenant
        figures = queue_stats(db, window).as_dict()
    engine.dispose()
    if as_json:
        click.echo(json.dumps(figures))
        return
    for name, value in figures.items():
        click.echo(f"{name:26} {'-' if value is None else (round(value, 3) if isinstance(value, float) else value)}")


@main.group()
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


@main.command()
@click.option("--agent", help="Agent to talk to (default: the first one served).")
@click.option("--session", "session_id", help="Continue this session instead of starting one.")
@click.option("--url", envvar="STEPRUN_URL", default="http://127.0.0.1:8000", show_default=True,
              help="The API's base URL (env STEPRUN_URL).")
@click.option("--key", envvar="STEPRUN_KEY", required=True, help="An API key (env STEPRUN_KEY).")
def chat(agent: str | None, session_id: str | None, url: str, key: str) -> None:
    """Chat with an agent in the terminal: each line is a turn, the answer streams back."""
    from steprun.chat import Chat, ChatError

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


@main.command()
@click.option("--port", type=int, help="Port (default: $PORT or 8000).")
def dev(port: int | None) -> None:
    """Everything in one process on the embedded default (SQLite + in-process queue and bus)."""
    from werkzeug.serving import make_server

    from api.app import create_app
    from scheduler.main import run_forever
    from shared.auth.keys import create_key
    from shared.db import unit_of_work
    from shared.logs import configure_logging
    from shared.migrate import upgrade
    from shared.turns.recovery import recover_after_restart

    settings = _settings()
    if port:
        settings = settings.replace(port=port)
    if not settings.secret_key:
        from shared.auth.stream_tokens import dev_secret_key

        # Stream tokens work out of the box in development; production must set STEPRUN_SECRET_KEY.
        settings = settings.replace(secret_key=dev_secret_key(settings.data_dir))
    configure_logging(settings)
    from shared.engine.step import build_runtime

    rt = build_runtime(settings)
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
    beat = None
    if settings.redis_url is None:
        from shared.fleet import WorkerBeat

        recover_after_restart(rt)
        beat = WorkerBeat(rt).start()  # this process runs the steps: it is the worker the console lists
    app = create_app(settings, runtime=rt)
    server = make_server(settings.host, settings.port, app, threaded=True)
    url = f"http://{settings.host}:{server.server_port}"
    stop = threading.Event()
    threading.Thread(target=run_forever, args=(rt, stop), name="scheduler", daemon=True).start()
    mode = "embedded" if settings.database_url is None else "Postgres"
    click.echo(f"steprun dev ({mode}) serving {url}")
    click.echo(f"dev key: {key}")
    click.echo(f"try: curl -s -H 'Authorization: Bearer {key}' {url}/v1/agents")
    agent = "math" if rt.agents.get("math") else next((a.name for a in rt.agents), "")
    click.echo(f"chat: STEPRUN_URL={url} STEPRUN_KEY={key} steprun chat --agent {agent}")
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        server.shutdown()
        if beat is not None:
            beat.stop()
        rt.close()


if __name__ == "__main__":  # pragma: no cover
    main()
