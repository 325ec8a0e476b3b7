"""facenets: face analysis with plain PyTorch.

Modules are independent on purpose, so one can be copied into a project alone:
    data      readers (FER2013, CelebA, UTKFace), splits, the decode cache, synthetic faces, MTCNN crops,
              labelled photos
    models    every architecture of the reports, by name
    augment   batched augmentations on image tensors, on any device
    metrics   classifier scores, age errors, GAN quality (offline, MTCNN features); pictures drawn with Pillow
    training  device, bf16, compile, optimizer and schedule, the weight average, Ctrl-C: around any training loop
    runs      run folders, atomic checkpoints and result files, resuming, the csv log, one-line errors
"""
