"""Packaging for lisa_ros: a normal ament_python package that also installs with pip."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "lisa_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    description="LISA reasoning segmentation for ROS 2: model, node, bag replay and training",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["lisa_model*", "lisa_ros*", "training*"]),
    # Data folders (the demo model, the examples, the training configs) are package data of
    # their package, listed here, not importable packages: with include_package_data setuptools
    # would take every folder holding a tracked file for a package it was not told about.
    include_package_data=False,
    package_data={
        "training": ["configs/*.yaml", "configs/*.json", "data/*.json"],
        "lisa_model": ["data/demo_model/*", "data/demo_model/vision_tower/*", "data/examples/*"],
    },
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml")),
    ],
    # Ranges only: the exact, tested set lives in constraints/dev.txt. On a robot the user brings
    # the torch build of their platform (Jetson, desktop CUDA).
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "transformers>=5.0,<6",
        "segment-anything>=1.0",
        "sentencepiece>=0.1.99",
        "protobuf>=3.20",
        "safetensors>=0.4",
        "huggingface_hub>=0.20",
        "numpy>=1.24",
        "opencv-python-headless>=4.8,<5",
        "pillow>=9.4",
        "tqdm>=4.64",
        "pyyaml>=6.0",
    ],
    extras_require={
        "train": [
            "deepspeed>=0.14",
            "peft>=0.10",
            "pycocotools>=2.0.6",
            "tensorboard>=2.14",
        ],
        "bags": ["rosbags>=0.10", "rosbags-image>=0.10"],
        "quant": ["bitsandbytes>=0.43"],
        "dev": ["pytest>=8", "ruff>=0.6"],
    },
    entry_points={
        "console_scripts": [
            "lisa-segment = lisa_model.cli.segment:main",
            "lisa-eval = training.evaluate:main",
            "lisa-train = training.train:main",
            "lisa-export = training.export:main",
            "lisa-make-shapes = training.shapes.writer:main",
            "lisa-demo = lisa_model.cli.demo:main",
            "lisa_node = lisa_ros.node:main",
            "text_relay = lisa_ros.text_relay:main",
            "lisa-replay = lisa_ros.replay:main",
            "lisa-make-demo-bag = lisa_ros.demo_bag:main",
            "lisa-demo-camera = lisa_ros.demo_camera:main",
        ],
    },
    zip_safe=True,
)
