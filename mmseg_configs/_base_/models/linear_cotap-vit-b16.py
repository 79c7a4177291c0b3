# Linear probe of a frozen CoTAP ViT-B/16: a 1x1 conv (FCNHead without convs) on
# the object-aware filter's 1536-d features (stride 16), logits upsampled to
# the label size. Point init_cfg.checkpoint to a file written by
#   python -m lightly_cotap.export --format mmseg --checkpoint IN --output OUT
# (a timm-format export or a Lightning / official CoTAP checkpoint works too).
data_preprocessor = dict(
    type="SegDataPreProcessor",
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
)
model = dict(
    type="EncoderDecoder",
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type="CoTAPViT",
        arch="vit_base_patch16_224",
        img_size=(224, 224),
        out_indices=(-1,),  # the last block: the filtered features
        use_filter=True,
        num_prototypes=64,
        prototype_size=3,
        frozen=True,
        init_cfg=dict(type="Pretrained", checkpoint="pretrain/cotap_vit-b16_mmseg.pth"),
    ),
    decode_head=dict(
        type="FCNHead",
        in_channels=1536,
        in_index=0,
        channels=1536,
        num_convs=0,
        concat_input=False,
        dropout_ratio=0.0,
        num_classes=21,
        norm_cfg=None,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    ),
    train_cfg=dict(),
    test_cfg=dict(mode="whole"),
)
