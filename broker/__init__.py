"""genq broker: the Redis data plane.

The only package that knows Redis keys or Lua. Workers and the API talk to
Redis exclusively through :class:`broker.client.Broker` and
:class:`broker.events.EventHub`.
"""

from broker.client import Broker
from broker.errors import BrokerError
from broker.models import Job, JobSpec, JobStatus
from broker.settings import BrokerSettings

__all__ = ["Broker", "BrokerError", "BrokerSettings", "Job", "JobSpec", "JobStatus"]
