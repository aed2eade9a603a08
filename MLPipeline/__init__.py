"""Transfer-learning document classifier: the public API.

    from MLPipeline import TrainConfig, train, load_model, predict
    run = train(TrainConfig(data_dir="Data", epochs=10))
    model = load_model("output/model.pt")
    results = predict(model, ["a.jpg", "b.png"])
    export_model("output/model.pt", "onnx")  # output/model.onnx, for ONNX Runtime; load_model() takes it too
"""
from MLPipeline.Common import UserError
from MLPipeline.CreateDataset import build_index, load_image, load_images
from MLPipeline.Export import OnnxModel, export_model
from MLPipeline.Predict import TrainedModel, evaluate, load_model, predict
from MLPipeline.ResNet_Model import build_model, load_checkpoint, save_checkpoint
from MLPipeline.Train import TrainConfig, TrainingRun, train

__all__ = ["UserError", "build_index", "load_image", "load_images", "build_model", "load_checkpoint",
           "save_checkpoint", "TrainConfig", "TrainedModel", "TrainingRun", "evaluate", "load_model", "predict",
           "train", "OnnxModel", "export_model"]
