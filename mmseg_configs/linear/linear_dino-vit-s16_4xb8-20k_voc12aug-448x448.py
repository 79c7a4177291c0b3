# Baseline through the same pipeline: a plain DINO ViT-S/16 (no object-aware
# filter, 384-d features after the final norm), e.g. the official
# dino_deitsmall16_pretrain.pth. Any timm / DINO / iBOT ViT checkpoint works.
_base_ = "./linear_cotap-vit-s16_4xb8-20k_voc12aug-448x448.py"
model = dict(
    backbone=dict(
        use_filter=False,
        init_cfg=dict(checkpoint="pretrain/dino_deitsmall16_pretrain.pth"),
    ),
    decode_head=dict(in_channels=384, channels=384),
)
