"""The accelerator backend (reserved: nothing here runs yet).

What goes here: the hybrid CPU-GPU engine's GPU half, applied to a built model the
way moed.backends.cpu is, by one `install(model, model_dir, ...) -> BackendInfo`:

- attention operations (subclasses of moed.backends.torch.GQAOps / MLAOps: project,
  store_kv or store, attend_prefill, attend_decodes) over a KV cache on the device;
- dense linears and norms as device modules swapped in for the reference ones, from
  `CausalLM.linear_modules()`;
- routed experts behind the same `forward(x, topk_ids, topk_weights)` as
  moed.backends.torch.TorchExperts: streamed to the device for long prefills, or left
  on the CPU backend's CPUExpertLayer for decodes;
- a CPU twin of each device kernel, so that its tests run on machines without one.

moed.backends.install is the one place that decides which backend serves each part;
it gains the choice of this one when it exists.
"""
