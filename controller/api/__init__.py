"""The HTTP API: OpenAI-compatible invocation, the admin API, /healthz and /metrics.

Every error leaves as OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with
the status code a client can act on. A request finds its instance (and pays any cold start)
before the response starts, so overload is a real 429/503 with `Retry-After` and the cold-start
facts travel as headers (`x-stoke-cold-start`, `x-stoke-node`, `x-stoke-load-ms`,
`x-stoke-tier`) on streaming responses too.

`app` composes it; one module per resource (`openai`, `admin_functions`, `admin_nodes`, `ops`);
`invoke` runs one invocation; `responses` shapes its tokens; `errors`, `body` and `deps` are
what every endpoint shares.
"""

from controller.api.app import create_app

__all__ = ["create_app"]
