_base_ = [
    "../_base_/models/linear_cotap-vit-b16.py",
    "../_base_/datasets/cocostuff27_448x448.py",
    "../_base_/default_runtime.py",
    "../_base_/schedules/linear_20k.py",
]
crop_size = (448, 448)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(img_size=crop_size),
    decode_head=dict(num_classes=27),
    test_cfg=dict(mode="slide", crop_size=crop_size, stride=(299, 299)),
)
# 4 GPUs x 8 images
train_dataloader = dict(batch_size=8)
