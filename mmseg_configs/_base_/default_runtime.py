# Runtime shared by every lightly-cotap mmseg config.
# Importing `lightly_cotap.mmseg` applies the mmcv-lite compatibility layer and
# registers the `CoTAPViT` backbone, `COCOStuff27Dataset`, the layer-decay
# optimizer constructor, the frozen-backbone check hook and the `QuietRunner`.
custom_imports = dict(imports=["lightly_cotap.mmseg"], allow_failed_imports=False)
# mmengine's Runner minus six warnings that mmseg / mmengine print in every run
# (each named in lightly_cotap.mmseg.runner); tools/train.py and test.py use it.
runner_type = "QuietRunner"
default_scope = "mmseg"
env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
    dist_cfg=dict(backend="nccl"),
)
vis_backends = [dict(type="LocalVisBackend")]
visualizer = dict(
    type="SegLocalVisualizer", vis_backends=vis_backends, name="visualizer"
)
log_processor = dict(by_epoch=False)
log_level = "INFO"
load_from = None
resume = False
tta_model = dict(type="SegTTAModel")
