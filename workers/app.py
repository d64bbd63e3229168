"""The worker's Celery app (what `celery -A workers.celery_app worker ...` runs, see workers/celery_app.py).

Reliability choices, and why:
- late acks + reject on worker lost: a task is acknowledged only after its step
  ran, so a dying *child* hands its message back;
- prefetch 1: a busy worker does not sit on steps another could run (with late
  acks a worker holds no more messages than it runs);
- none of that is relied on for correctness. A gevent-pool worker that is
  SIGKILLed never gets its unacked messages restored by the broker in useful
  time, so recovery is the scheduler's (shared/turns/recovery.py): the Postgres
  lease sweep for the steps it ran, and the lost-task sweep for tasks it had
  taken but not yet claimed (neither claimed nor waiting in the queue for
  STEPRUN_UNCLAIMED_TASK_SECONDS). Duplicates are made harmless by the fenced
  claim (shared/engine/claim.py);
- the worker keeps its unacknowledged messages in memory only (kombu's Redis
  ``ack_emulation`` off): late acks still bound what it takes (prefetch), and a
  warm shutdown still hands back what it took and did not run, but no copy of
  each message is written to and deleted from Redis around every step (8 Redis
  commands per step: MULTI/ZADD/HSET/EXEC, then MULTI/ZREM/HDEL/EXEC). That copy
  only served kombu's visibility-timeout redelivery, which recovery does not
  use (above): a SIGKILLed worker's taken-but-unclaimed task is re-sent by the
  lost-task sweep, as before. The broker's visibility timeout (shared/queue.py)
  is still set for the scheduler, which hands back what older workers left;
  the step's own watch enforces STEPRUN_STEP_TIME_LIMIT, since Celery's time
  limits do not apply to the gevent pool;
- the connection to Redis may drop (a Redis restart): running steps carry on
  and commit to Postgres rather than being cancelled, and the lost-task sweep
  re-sends whatever the restart took from the queue;
- shutdown: SIGTERM is a warm shutdown (running steps finish; the ones still
  running after STEPRUN_SHUTDOWN_GRACE_SECONDS hand themselves back, see
  workers/shutdown.py). SIGQUIT, or SIGTERM with REMAP_SIGTERM=SIGQUIT, is a
  cold shutdown preceded by a soft one of the same grace plus 5 s.

The process's runtime (engine, Redis, agents) is built when the worker starts
and kept on the app (workers/runtime.py); tasks read it from ``self.app``.
"""
from __future__ import annotations

from celery import Celery

from shared.queue import celery_config
from shared.settings import Settings
from workers.observability import install_worker_observability
from workers.runtime import install_worker_runtime
from workers.shutdown import install_shutdown_drain


def create_celery(settings: Settings) -> Celery:
    app = Celery("steprun")
    config = celery_config(settings)
    config["broker_transport_options"] = {**config["broker_transport_options"], "ack_emulation": False}
    app.conf.update(config)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=settings.worker_concurrency,
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
        # Celery >= 5.5, cold shutdown only (SIGQUIT): running steps get the drain's grace
        # (they hand themselves back at its end) before Celery cancels what is left.
        worker_soft_shutdown_timeout=settings.shutdown_grace_seconds + 5.0,
        worker_enable_soft_shutdown_on_idle=True,
        # On a broker connection loss keep running steps: they commit to Postgres, and the
        # fenced claim makes any redelivery harmless. Cancelling them would waste the model call.
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    install_worker_runtime(app, settings)
    install_shutdown_drain(app)
    install_worker_observability(settings)
    app.autodiscover_tasks(["workers"], related_name="tasks", force=True)
    return app
