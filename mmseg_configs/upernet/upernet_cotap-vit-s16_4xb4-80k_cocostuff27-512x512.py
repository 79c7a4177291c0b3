_base_ = [
    "../_base_/models/upernet_cotap-vit-s16.py",
    "../_base_/datasets/cocostuff27_512x512.py",
    "../_base_/default_runtime.py",
    "../_base_/schedules/finetune_80k.py",
]
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(img_size=crop_size),
    decode_head=dict(num_classes=27),
    auxiliary_head=dict(num_classes=27),
    test_cfg=dict(mode="slide", crop_size=crop_size, stride=(341, 341)),
)
# 4 GPUs x 4 images
train_dataloader = dict(batch_size=4)
