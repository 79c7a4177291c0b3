_base_ = [
    "../_base_/models/linear_cotap-vit-s16.py",
    "../_base_/datasets/cityscapes_512x1024.py",
    "../_base_/default_runtime.py",
    "../_base_/schedules/linear_20k.py",
]
crop_size = (512, 1024)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(img_size=crop_size),
    decode_head=dict(num_classes=19),
    test_cfg=dict(mode="slide", crop_size=crop_size, stride=(341, 683)),
)
# CoTAP's linear protocol uses lr 1e-3 on Cityscapes (3e-3 elsewhere).
optim_wrapper = dict(optimizer=dict(lr=1e-3))
# 4 GPUs x 8 images
train_dataloader = dict(batch_size=8)
