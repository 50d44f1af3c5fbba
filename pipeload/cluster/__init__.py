"""One model over several machines: pipeline and tensor parallel over torch.distributed (gloo).

    placement.py   which node runs which layers and how fast (pure functions)
    shard.py       tensor-parallel shard specs and the block that runs a shard
    protocol.py    the messages between coordinator and stages
    rendezvous.py  joining through torch's TCPStore: version, model checksum, late joiners
    stage.py       what a worker holds and runs (its layers or shards, its KV caches)
    worker.py      `pipeload worker`: heartbeat, plans, the data path
    coordinator.py rank 0: drives steps, keeps the logs that rebuild a lost node's caches
    recovery.py    noticing a dead node, re-planning over survivors, replaying
    launch.py      forming the cluster; ClusterEngine, the Engine the rest of pipeload uses
    probe.py       `pipeload probe`: a node's measured speeds, per watt and per dollar

Import `connect_cluster` from pipeload.cluster.launch (this package imports nothing heavy).
"""
