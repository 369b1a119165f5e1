"""cmaclip: distributed CMA-CLIP training. Install torch first (see Makefile): a bare `torch`
requirement in a fresh environment pulls a multi-GB CUDA build."""
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
requirements = [
    line.split("#")[0].strip()
    for line in (here / "requirements" / "base.txt").read_text().splitlines()
    if line.split("#")[0].strip() and not line.startswith("pytest")
]

setup(
    name="cmaclip",
    version="0.1.0",
    description="Distributed training of CMA-CLIP (Cross-Modality Attention CLIP) product-attribute classifiers",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["cmaclip", "cmaclip.*"]),
    package_data={"cmaclip": ["data/assets/*", "configs/*.yaml"]},
    install_requires=["torch>=2.4"] + requirements,
    entry_points={"console_scripts": ["cmaclip=cmaclip.cli:main"]},
)
