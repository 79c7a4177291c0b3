_base_ = [
    "../_base_/models/fcn_cotap-vit-b16.py",
    "../_base_/datasets/pascal_voc12_aug_512x512.py",
    "../_base_/default_runtime.py",
    "../_base_/schedules/finetune_40k.py",
]
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(img_size=crop_size),
    decode_head=dict(num_classes=21),
    auxiliary_head=dict(num_classes=21),
    test_cfg=dict(mode="slide", crop_size=crop_size, stride=(341, 341)),
)
# 4 GPUs x 4 images
train_dataloader = dict(batch_size=4)
