"""Reading a service's Prometheus metrics over HTTP, for the tests and the soak."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


def _selector(text: str) -> Sample:
    """`name` or `name{label="value",...}` as the sample it selects (read by the same parser)."""
    (family,) = text_string_to_metric_families(f"{text} 0\n")
    (sample,) = family.samples
    return sample


async def metric(
    url: str, name: str | tuple[str, ...], *, unreachable: float | None = None
) -> float:
    """The sum of the samples at `url`/metrics that `name` selects (or any of several): a
    sample's full name (`pubsock_deaf_total`), with labels it must have if given
    (`pubsock_rewinds_total{result="complete"}`); 0 while there are none. `unreachable`, when
    given, is the answer while nothing answers at `url`."""
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            text = (await client.get(f"{url}/metrics")).text
    except httpx.HTTPError:
        if unreachable is None:
            raise
        return unreachable
    selectors = [_selector(n) for n in ((name,) if isinstance(name, str) else name)]
    return sum(
        (
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if any(
                sample.name == wanted.name and wanted.labels.items() <= sample.labels.items()
                for wanted in selectors
            )
        ),
        0.0,
    )
