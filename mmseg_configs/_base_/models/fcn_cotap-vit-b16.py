# FCN fine-tuning of a CoTAP ViT-B/16: FCNHead (2 convs, 512 channels, concat
# input) on the object-aware filter's 1536-d features, auxiliary FCNHead on
# block 7 (loss weight 0.4). The whole backbone is trained.
norm_cfg = dict(type="SyncBN", requires_grad=True)
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
        out_indices=(7, 11),
        use_filter=True,
        num_prototypes=64,
        prototype_size=3,
        frozen=False,
        drop_path_rate=0.1,
        init_cfg=dict(type="Pretrained", checkpoint="pretrain/cotap_vit-b16_mmseg.pth"),
    ),
    decode_head=dict(
        type="FCNHead",
        in_channels=1536,
        in_index=1,
        channels=512,
        num_convs=2,
        concat_input=True,
        dropout_ratio=0.1,
        num_classes=21,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    ),
    auxiliary_head=dict(
        type="FCNHead",
        in_channels=768,
        in_index=0,
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=21,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4),
    ),
    train_cfg=dict(),
    test_cfg=dict(mode="whole"),
)
