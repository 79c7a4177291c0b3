# PASCAL VOC 2012 + SBD ("aug", 10,582 train images, 21 classes incl.
# background, 255 = boundary/ignore); evaluated on VOC val (1,449).
# Layout of mmseg's tools/dataset_converters/voc_aug.py:
#   data/VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,SegmentationClassAug}
#   data/VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val,aug}.txt
dataset_type = "PascalVOCDataset"
data_root = "data/VOCdevkit/VOC2012"
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
dataset_train = dict(
    type=dataset_type,
    data_root=data_root,
    data_prefix=dict(img_path="JPEGImages", seg_map_path="SegmentationClass"),
    ann_file="ImageSets/Segmentation/train.txt",
    pipeline=train_pipeline,
)
dataset_aug = dict(
    type=dataset_type,
    data_root=data_root,
    data_prefix=dict(img_path="JPEGImages", seg_map_path="SegmentationClassAug"),
    ann_file="ImageSets/Segmentation/aug.txt",
    pipeline=train_pipeline,
)
train_dataloader = dict(
    batch_size=4,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type="InfiniteSampler", shuffle=True),
    dataset=dict(type="ConcatDataset", datasets=[dataset_train, dataset_aug]),
)
val_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path="JPEGImages", seg_map_path="SegmentationClass"),
        ann_file="ImageSets/Segmentation/val.txt",
        pipeline=test_pipeline,
    ),
)
test_dataloader = val_dataloader

val_evaluator = dict(type="IoUMetric", iou_metrics=["mIoU"])
test_evaluator = val_evaluator
