"""Speed and memory options for sampling: step caches, weight offloading and tiling, context parallelism.
Each is opt-in and leaves the model's output exact or within a stated bound (tests say which)."""
