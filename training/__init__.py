"""Fine-tuning, data sets, evaluation and export for LISA. Knows lisa_model, never ROS."""
