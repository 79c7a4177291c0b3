# End-to-end fine-tuning of the ViT (the BEiT / MAE / iBOT recipe in mmseg):
# AdamW, lr 1e-4, weight decay 0.05, layer-wise lr decay 0.65, 1500 warm-up
# iterations, then linear (poly 1.0) decay to 0 over 40k iterations.
# Validation and checkpoints every max_iters // 10 iterations and at the end.
# The PolyLR has no `end`: mmengine ends it at train_cfg.max_iters, so
# `--cfg-options train_cfg.max_iters=N` shortens the whole schedule (intervals
# stay). A child config that changes max_iters restates train_cfg and
# default_hooks.checkpoint, as `lightly-cotap mmseg-config --iters N` writes.
max_iters = 40000
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    constructor="CoTAPLayerDecayOptimWrapperConstructor",
    paramwise_cfg=dict(layer_decay_rate=0.65),
)
param_scheduler = [
    dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type="PolyLR", eta_min=0.0, power=1.0, begin=1500, by_epoch=False),
]
train_cfg = dict(
    type="IterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters // 10
)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type="ParamSchedulerHook"),
    checkpoint=dict(
        type="CheckpointHook",
        by_epoch=False,
        interval=max_iters // 10,
        max_keep_ckpts=2,
    ),
    sampler_seed=dict(type="DistSamplerSeedHook"),
    visualization=dict(type="SegVisualizationHook"),
)
