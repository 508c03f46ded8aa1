# Worker container for Dataflow (Runner v2) and other portable runners:
# the Beam Python SDK image (its /opt/apache/beam/boot entry point starts
# the SDK worker), with this project and its pinned dependencies installed,
# so workers neither pip-install at start-up nor need --setup_file.
#
#   CPU: docker build -t REGION-docker.pkg.dev/PROJECT/REPO/bert-zh-embed:0.1.0 .
#   GPU: docker build --build-arg VARIANT=gpu \
#          -t REGION-docker.pkg.dev/PROJECT/REPO/bert-zh-embed-gpu:0.1.0 .
#
# Then run the job with --sdk_container_image=<that tag> (see the README,
# "Running on Dataflow"). PYTHON_VERSION and BEAM_VERSION must match the
# launching environment (Python minor version and apache-beam pin).
#
# The GPU variant adds TensorFlow's CUDA/cuDNN libraries from PyPI
# (tensorflow[and-cuda]); the NVIDIA driver comes from Dataflow's
# worker_accelerator service option (install-nvidia-driver).

ARG PYTHON_VERSION=3.11
ARG BEAM_VERSION=2.77.0

FROM apache/beam_python${PYTHON_VERSION}_sdk:${BEAM_VERSION}

# Re-declared: an ARG before FROM is visible to FROM only.
ARG BEAM_VERSION
# cpu or gpu
ARG VARIANT=cpu
ARG TF_VERSION=2.21.0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    TF_FORCE_GPU_ALLOW_GROWTH=true

WORKDIR /opt/bert_zh_embed

# Dependencies first, in a layer that survives code changes: install the
# project with empty packages (pulls every pinned dependency), drop it, and
# install the real code afterwards without touching the dependencies.
COPY constraints.txt setup.py ./
RUN mkdir -p pipeline transforms model \
    && touch pipeline/__init__.py transforms/__init__.py model/__init__.py \
    && pip install -c constraints.txt . \
    && if [ "$VARIANT" = "gpu" ]; then \
         pip install -c constraints.txt "tensorflow[and-cuda]==${TF_VERSION}"; \
       elif [ "$VARIANT" != "cpu" ]; then \
         echo "VARIANT must be cpu or gpu, got $VARIANT" >&2; exit 1; \
       fi \
    && pip uninstall -y bert-zh-embed

COPY pipeline ./pipeline
COPY transforms ./transforms
COPY model ./model
RUN pip install --no-deps -c constraints.txt . \
    && pip check \
    && cd / && python -c "import apache_beam, tensorflow, pipeline.graph, transforms.infer, model.load; assert apache_beam.__version__ == '${BEAM_VERSION}', apache_beam.__version__; assert tensorflow.__version__ == '${TF_VERSION}', tensorflow.__version__"

# Start the Beam SDK worker (the base image's entry point, restated so that
# nothing built on top of this image changes it by accident).
ENTRYPOINT ["/opt/apache/beam/boot"]
