# Flex Template image: the worker image from ../Dockerfile plus Google's
# Python Flex Template launcher, so one image both launches the job and runs
# its workers (pass it as the template image and as sdk_container_image).
#
# Build from the repository root, after building the worker image:
#   docker build -f dataflow/Dockerfile.flex \
#     --build-arg WORKER_IMAGE=REGION-docker.pkg.dev/PROJECT/REPO/bert-zh-embed:0.1.0 \
#     -t REGION-docker.pkg.dev/PROJECT/REPO/bert-zh-embed-flex:0.1.0 .
#
# LAUNCHER_IMAGE's Python minor version must match the worker image's.

ARG WORKER_IMAGE=bert-zh-embed:0.1.0
ARG LAUNCHER_IMAGE=gcr.io/dataflow-templates-base/python311-template-launcher-base:latest

FROM ${LAUNCHER_IMAGE} AS launcher

FROM ${WORKER_IMAGE}

COPY --from=launcher /opt/google/dataflow/python_template_launcher \
     /opt/google/dataflow/python_template_launcher

COPY dataflow/flex_main.py /template/flex_main.py

# The project and its dependencies are already installed in the worker
# image, so the launcher needs neither a requirements nor a setup file.
ENV FLEX_TEMPLATE_PYTHON_PY_FILE=/template/flex_main.py

# Workers start through the Beam boot entry point; Dataflow starts the
# launcher binary itself on the launcher VM.
ENTRYPOINT ["/opt/apache/beam/boot"]
