"""Signed webhooks from a durable outbox, in OpenAI's webhook format (DESIGN section 11.2).

- :mod:`~shared.webhooks.outbox` — the event row, written in the transaction that changes a turn;
- :mod:`~shared.webhooks.signing` — secrets and the ``webhook-*`` headers (Standard Webhooks, as OpenAI signs);
- :mod:`~shared.webhooks.urls` — which URLs may receive deliveries (no private addresses unless allowed);
- :mod:`~shared.webhooks.endpoints` — a tenant's endpoints and their delivery log (service functions);
- :mod:`~shared.webhooks.delivery` — the scheduler's fan-out and sending, with backoff and jitter.
"""
