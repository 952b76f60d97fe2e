"""What writes models and their records: export, int8 quantization, ensembles, calibration
images, the package README and the fp16/int8 agreement. The serving side imports none of it."""
