"""Keys as an operator handles them: `steprun keys create / list / revoke`, seen by a real web process."""
from __future__ import annotations

import secrets
import subprocess

import requests

from tests.support.processes import BIN, Procs, create_key_cli, settings_env


def test_keys_cli_lists_and_revokes(procs: Procs) -> None:
    """An operator revokes a key with the CLI; a web process with no key cache refuses it at once."""
    env = settings_env(procs.settings)
    env["STEPRUN_KEY_CACHE_SECONDS"] = "0"
    tenant = f"t-{secrets.token_hex(3)}"
    key = create_key_cli(env, tenant, "carol")
    listed = subprocess.run([str(BIN / "steprun"), "keys", "list", "--tenant", tenant], env=env,
                            capture_output=True, text=True, check=True).stdout
    key_id = listed.split()[0]
    assert key_id.startswith("key_") and key[:10] in listed and "carol" in listed and "live" in listed
    assert key not in listed  # the key itself is never stored, so never shown

    _, url = procs.web(env=env)
    h = {"Authorization": f"Bearer {key}"}
    assert requests.get(f"{url}/v1/sessions", headers=h).status_code == 200
    out = subprocess.run([str(BIN / "steprun"), "keys", "revoke", key_id], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert f"revoked {key_id}" in out
    r = requests.get(f"{url}/v1/sessions", headers=h)
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
    again = subprocess.run([str(BIN / "steprun"), "keys", "revoke", key_id], env=env, capture_output=True,
                           text=True)
    assert again.returncode != 0 and "no live key" in again.stderr
