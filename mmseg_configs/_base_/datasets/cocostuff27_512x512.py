# COCO-Stuff-27: COCO-Stuff 164k with the 182 fine labels merged into the 27
# coarse classes of dense SSL papers (IIC / PiCIE / STEGO / CoTAP), on STEGO's
# curated split (49,629 train / 2,175 val images).
#   data/coco_stuff164k/images/{train2017,val2017}/<id>.jpg
#   data/coco_stuff164k/annotations/{train2017,val2017}/<id>.png   (raw 0-181)
#   data/coco_stuff164k/curated/{train2017,val2017}/Coco164kFull_Stuff_Coarse.txt
# Write the 27-class label maps <id>_labelTrainIds27.png with
#   python -m lightly_cotap.mmseg.convert_cocostuff27 data/coco_stuff164k/annotations
# (set ann_file='' to train / evaluate on every image instead).
dataset_type = "COCOStuff27Dataset"
data_root = "data/coco_stuff164k"
crop_size = (512, 512)
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations"),
    dict(
        type="RandomResize", scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True
    ),
    dict(type="RandomCrop", crop_size=crop_size, cat_max_ratio=0.75),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PhotoMetricDistortion"),
    dict(type="PackSegInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=(2048, 512), keep_ratio=True),
    # ground truth is loaded after Resize: metrics use the original labels
    dict(type="LoadAnnotations"),
    dict(type="PackSegInputs"),
]
img_ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
tta_pipeline = [
    dict(type="LoadImageFromFile", backend_args=None),
    dict(
        type="TestTimeAug",
        transforms=[
            [dict(type="Resize", scale_factor=r, keep_ratio=True) for r in img_ratios],
            [
                dict(type="RandomFlip", prob=0.0, direction="horizontal"),
                dict(type="RandomFlip", prob=1.0, direction="horizontal"),
            ],
            [dict(type="LoadAnnotations")],
            [dict(type="PackSegInputs")],
        ],
    ),
]
train_dataloader = dict(
    batch_size=4,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type="InfiniteSampler", shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(
            img_path="images/train2017", seg_map_path="annotations/train2017"
        ),
        ann_file="curated/train2017/Coco164kFull_Stuff_Coarse.txt",
        pipeline=train_pipeline,
    ),
)
val_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path="images/val2017", seg_map_path="annotations/val2017"),
        ann_file="curated/val2017/Coco164kFull_Stuff_Coarse.txt",
        pipeline=test_pipeline,
    ),
)
test_dataloader = val_dataloader

val_evaluator = dict(type="IoUMetric", iou_metrics=["mIoU"])
test_evaluator = val_evaluator
