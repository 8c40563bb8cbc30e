"""What Olive calls things and what phitune calls them: the tables the translation reads
(pass and model types, keys with a phitune option of the same meaning, keys that say what
phitune does anyway), as data. Olive's names are its documented config keys.
"""

PASSES = ("AutoAWQQuantizer", "GptqQuantizer", "LoRA", "QLoRA", "MergeAdapterWeights",
          "ModelBuilder", "ExtractAdapters")
MODEL_TYPES = ("HfModel", "HFModel", "PyTorchModel", "PytorchModel")
AZURE_TYPES = ("AzureML", "azureml_model", "azureml_registry_model", "azureml_datastore",
               "azureml_job_output")
NOT_LOCAL_SYSTEMS = ("AzureML", "Docker", "DockerSystem", "PythonEnvironment", "IsolatedORT")
LOCAL_FILE_FORMATS = ("json", "csv", "parquet")
# A LoRA pass's keys and training_args that are finetune options of the same name and meaning
LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "target_modules")
TRAINING_ARGS = ("max_steps", "num_train_epochs", "learning_rate", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "warmup_steps", "max_grad_norm", "seed",
                 "gradient_checkpointing", "save_steps", "eval_steps")
ENGINE_KEYS = ("cache_dir", "output_dir", "host", "target", "execution_providers",
               "search_strategy", "log_severity_level", "ort_log_severity_level",
               "ort_py_log_severity_level", "log_to_file", "evaluator", "evaluate_input_model",
               "clean_cache", "clean_evaluation_cache", "packaging_config", "output_name",
               "plot_pareto_frontier", "no_artifacts")
# Olive input-model keys phitune needs no equivalent of: it reads the checkpoint itself
MODEL_LOADING_KEYS = ("model_script", "script_dir", "io_config", "dummy_inputs_func",
                      "model_file_format", "model_attributes", "model_loader")
TASKS = ("text-generation", "text-generation-with-past", "causal-lm")
# AutoAWQQuantizer keys → quantize options
AWQ_OPTIONS = {"bits": "bits", "w_bit": "bits", "group_size": "group_size",
               "q_group_size": "group_size", "zero_point": "zero_point"}
# ModelBuilder keys → auto-opt options
BUILDER_OPTIONS = {"int4_block_size": "block_size", "int4_accuracy_level": "accuracy_level"}
PRECISIONS = ("int4", "fp16", "fp32")
# GptqQuantizer settings that are what phitune's GPTQ does anyway (not noted as dropped)
GPTQ_AS_PHITUNE = {"damp_percent": 0.01, "true_sequential": True, "static_groups": True,
                   "desc_act": True, "lm_head": False}
# QLoRA settings that are what phitune's qlora does
QLORA_AS_PHITUNE = (("quant_type", "nf4"), ("double_quant", True))

NO_EQUIVALENT = "no phitune equivalent, not applied"
# An Olive quantizer's data_config, for AWQ and GPTQ alike
CALIBRATION_NOT_APPLIED = ("phitune calibrates on its shipped text (calib_data in a phitune "
                           "workflow); not applied")
