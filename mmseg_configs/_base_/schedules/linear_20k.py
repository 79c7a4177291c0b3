# Linear probe on a frozen backbone (only the 1x1 conv head is trained).
# Optimiser of the CoTAP linear protocol (Adam, lr 3e-3, no weight decay); the
# budget of 20k iterations x 32 images = 640k samples matches CrIBo's mmseg
# linear evaluation (8 x 1 x 80k). CoTAP keeps the lr constant for its short
# schedule (100k samples); over 20k iterations we decay it (poly 0.9).
# Validation and checkpoints every max_iters // 10 iterations and at the end.
# The PolyLR has no `end`: mmengine ends it at train_cfg.max_iters, so
# `--cfg-options train_cfg.max_iters=N` shortens the whole schedule (intervals
# stay). A child config that changes max_iters restates train_cfg and
# default_hooks.checkpoint, as `lightly-cotap mmseg-config --iters N` writes.
max_iters = 20000
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="Adam", lr=3e-3, betas=(0.9, 0.999), weight_decay=0.0),
    clip_grad=None,
)
param_scheduler = [dict(type="PolyLR", eta_min=0.0, power=0.9, begin=0, by_epoch=False)]
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
# Fails before the first step if the frozen backbone is trainable, and after
# the first step if the optimiser changed it anyway (see CoTAPViT.frozen).
custom_hooks = [dict(type="FrozenBackboneCheckHook", priority="VERY_HIGH")]
