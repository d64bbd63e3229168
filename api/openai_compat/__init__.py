"""The OpenAI Responses + Conversations API (DESIGN 10.1): a translation over sessions, turns and events.

- :mod:`.ids` — response, conversation and item ids, and the turns/sessions they name;
- :mod:`.inputs` — what a client may send as ``input``;
- :mod:`.objects` — committed rows as Response, Conversation and item objects;
- :mod:`.store` — the scoped reads behind them;
- :mod:`.stream` — the event log as OpenAI's stream of events;
- :mod:`.responses`, :mod:`.conversations` — the routes; :mod:`.docs` — their OpenAPI description.
"""
