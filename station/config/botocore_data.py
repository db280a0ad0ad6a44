"""One botocore data loader per process: AWS's service and endpoint models read once.

botocore parses its JSON models (endpoints.json, partitions, the IoT API) per loader, and
every new session makes its own loader. `station run` needs them twice at start: the
config's region check (reader.py) and the registrar's one IoT client (aws_client.py);
sharing the loader parses them once (measured: a client on a fresh session 99 ms of CPU,
on a session sharing the region check's loader 24 ms). botocore (not boto3) is enough for
a client, and it is imported only here, only when a config asks for AWS.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def data_loader() -> Any:
    """botocore's loader (it caches what it loaded per instance), made once."""
    import botocore.loaders

    return botocore.loaders.create_loader()


def aws_session(profile: str = "") -> Any:
    """A new botocore session (`profile`, or the default credential chain) whose models
    come from the shared loader."""
    import botocore.session

    session = botocore.session.Session(profile=profile or None)
    session.register_component("data_loader", data_loader())
    return session
