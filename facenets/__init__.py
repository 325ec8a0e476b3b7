"""facenets: face analysis with plain PyTorch.

Modules are independent on purpose, so one can be copied into a project alone:
    data     readers (FER2013 folders, zip, csv), splits, the decode cache, synthetic faces, MTCNN crops
    models   every architecture of the reports, by name
    augment  batched augmentations on image tensors, on any device
    metrics  confusion matrix, per-class tables, curves and heat maps drawn with Pillow
    runs     run folders, atomic checkpoints and result files, the csv log, one-line flag errors
"""
