"""The accelerator backend: the hybrid CPU-GPU engine's GPU half (being built).

What is here now, tested on the CPU:

- `device`: the small device interface the pipelines are written against (streams,
  events, host staging buffers, device buffers, asynchronous host -> device copies),
  with two implementations: `cuda_device` (torch.cuda streams and events, pinned
  memory, non_blocking copies; the product) and `cpu_device` (a thread per stream,
  memcpy with an optional bandwidth cap, an event log of what ran when), whose only
  purpose is that the same pipeline code runs and is tested where there is no GPU;
- `ring`: an expert's weights as one byte block (FP8 stays FP8, with its scales), the
  device ring of expert slots with ready/done events, allocated once, and the ring
  length from an expert's copy and compute times and the free device memory;
- `tiles`: the device linear under the precision contract (BF16 inputs, FP8 widened
  to BF16 per k block with its block scales applied in FP32, FP32 sums), with its CPU
  twin;
- `streamed_experts`: StreamedExperts, one MoE layer's routed experts over a chunk of
  tokens, streamed from host memory through the ring (the core of stream-loading
  prefill), behind the same `forward(x, topk_ids, topk_weights)` as
  moed.backends.torch.TorchExperts; its experts run on `tiles`, so on the CPU device
  its output agrees with the CPU backend's kernels within the contract.
- `expert_parallel`: ShardedExperts, one layer's routed experts split across
  torch.distributed ranks (a contiguous share each, routing recomputed on every rank,
  one all-reduce of the partial sums), behind the same interface.

Still to come, applied to a built model the way moed.backends.cpu is, by one
`install(model, model_dir, ...) -> BackendInfo`:

- attention operations (subclasses of moed.backends.torch.GQAOps / MLAOps: project,
  store_kv or store, attend_prefill, attend_decodes) over a KV cache on the device;
- dense linears and norms as device modules swapped in for the reference ones, from
  `CausalLM.linear_modules()`;
- routed experts: StreamedExperts for long prefills (chunking by device memory, the
  ring length and its measured constants from the planner), or left on the CPU
  backend's CPUExpertLayer for decodes;
- a CPU twin of each device kernel, so that its tests run on machines without one.

moed.backends.install is the one place that decides which backend serves each part;
it gains the choice of this one when it exists.
"""
