"""A hostile SuperNode's ClientApp process (a test tool): `fedlora.flower.node_runner` whose
train replies are rewritten before they are pushed. Every train reply claims 10**12 examples,
carries an update scaled to a contribution norm of 99 x 19**(k-1) in its k-th round (the
escalating client of issue 27), and a ``fedlora.node-place`` record with a bytes value (which
broke result.json before issue 27).

    python tests/hostile_node.py --runtime-api-address 127.0.0.1:PORT --insecure
"""

from __future__ import annotations

import logging
import sys

from flwr.app import ConfigRecord, Message

from fedlora.core.norms import contribution_norm, scale_adapter
from fedlora.flower import codec
from fedlora.flower.node_runner import NodeRunner

LOG = logging.getLogger("fedlora.flower")


class HostileRunner(NodeRunner):
    """`NodeRunner` whose ClientApp's train replies are made hostile."""

    trained = 0

    def _app(self, run, fab):
        app = super()._app(run, fab)

        def hostile(message: Message, context) -> Message:
            reply = app(message=message, context=context)
            if message.metadata.message_type != "train" or reply.has_error():
                return reply
            HostileRunner.trained += 1
            u = codec.decode_update(reply.content)
            target = 99.0 * 19.0 ** (HostileRunner.trained - 1)
            n = contribution_norm(u.adapter, {m: None for m in u.adapter})
            u.adapter = scale_adapter(u.adapter, target / n)
            u.num_examples = 10**12
            content = codec.encode_update(u)
            for name in (codec.SPEC, codec.NODE, codec.NODE_METRICS):
                if name in reply.content:
                    content[name] = reply.content[name]
            content[codec.NODE_PLACE] = ConfigRecord({"host": b"\x00\xff" * 64, "pid": 1})
            LOG.warning("hostile node: reply %d scaled to norm %.4g", HostileRunner.trained, target)
            return Message(content, reply_to=message)

        return hostile


if __name__ == "__main__":
    import fedlora.flower.node_runner as runner

    runner.NodeRunner = HostileRunner  # main() builds the runner by this name
    runner.main(sys.argv[1:])
