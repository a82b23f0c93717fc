"""Which redis-py errors mean "Redis is away or switching" (the broker answers Unavailable: retry later)."""

from __future__ import annotations

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from broker.errors import topology_changing

UNBLOCKED = "UNBLOCKED force unblock from blocking operation, instance state changed (master -> replica?)"


@pytest.mark.parametrize(
    ("error", "changing"),
    [
        (RedisConnectionError("Connection refused"), True),
        (ResponseError(UNBLOCKED), True),
        (ResponseError("NOREPLICAS Not enough good replicas to write."), True),
        # a failover seen inside a pipeline: redis-py prefixes the reply with the command
        (ResponseError(f"Command # 2 (WAIT 1 500) of pipeline caused error: ('{UNBLOCKED}',)"), True),
        # seen in CI: the WAIT after an admission reached the old master once it had become a replica
        (
            ResponseError(
                "Command # 2 (WAIT 1 500) of pipeline caused error: ('WAIT cannot be used with replica instances. "
                "Please also note that writes to replicas are just local and are not propagated.',)"
            ),
            True,
        ),
        (ResponseError("ERR unknown command 'NOPE'"), False),
        (ResponseError("Command # 1 (EVALSHA abc 0) of pipeline caused error: ('ERR bad script',)"), False),
    ],
)
def test_topology_changing(error: Exception, changing: bool) -> None:
    assert topology_changing(error) is changing
