"""One process of tests/test_sharding.py's multi-process test (started by jaxchunk.launch, or alone
on one device for the reference): greedy tokens of the tiny model on a 1 x (all devices) mesh,
printed as one JSON line by process 0. Argument: the mesh's data size (default 1: 1 x all devices)."""
import json
import sys

from jaxchunk.launch import initialize

distributed = initialize()  # before JAX is used

import jax  # noqa: E402

from jaxchunk import sharding  # noqa: E402
from jaxchunk.cache import init_cache  # noqa: E402
from jaxchunk.generate import generate_ids  # noqa: E402
from tests.sharding_worker import CHUNK, MAX_SEQ, load_model, prompts_for  # noqa: E402

data = int(sys.argv[1]) if len(sys.argv) > 1 else 1   # the data axis size (runs across processes first)
config, params, _ = load_model("tiny", "f32")
prompts = prompts_for(config)
cache = init_cache(config, 2, MAX_SEQ)
n = jax.device_count()
if n > 1:
    mesh = sharding.make_mesh(data, n // data)
    params, cache = sharding.shard_params(params, config, mesh), sharding.shard_cache(cache, config, mesh)
_, ids = generate_ids(params, config, cache, prompts, max_new_tokens=8, chunk_size=CHUNK)
if jax.process_index() == 0:
    print(json.dumps({"processes": jax.process_count(), "devices": n, "ids": ids,
                      "attention": sharding.plan_for(config, {"data": data, "model": n // data}).attention}))
