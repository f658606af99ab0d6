# Triton on the CPU with no NGC pull: the tritonserver 2.51 of the nvidia-pytriton wheel (the binary `hpeft serve`
# runs, Python backend), set up as `hpeft serve` sets it up, serving model `hpeft` with onnxruntime (CPU).
# Same command line as the NGC image (compose, Kubernetes): `tritonserver FLAGS` is a wrapper that adds the
# wheel's backend folder and library path (triton_cpu_setup.py). No torch, no transformers.
# The base is a build argument: a Debian base made locally by debootstrap (deploy/check.py), or a registry's:
#   podman build -f deploy/docker/triton-cpu.Dockerfile -t hpeft-serve/triton-cpu:0.1.0 .
#   docker build --build-arg BASE_IMAGE=python:3.11-slim -f deploy/docker/triton-cpu.Dockerfile ...
# Where pip needs a CA bundle of its own (a proxy), pass it as a build secret; it is never in a layer:
#   podman build --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt ...
ARG BASE_IMAGE=localhost/debian:bookworm-minbase
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PATH=/opt/hpeft/bin:$PATH
COPY deploy/docker/python-base.sh deploy/docker/requirements-triton-cpu.txt /tmp/build/
RUN /tmp/build/python-base.sh
RUN --mount=type=secret,id=pip_cert \
    if [ -f /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    pip install -r /tmp/build/requirements-triton-cpu.txt 'setuptools>=68'

# the package without its declared dependencies (they include torch and transformers, for training/export);
# no build isolation: setuptools is installed above, where pip may reach the index
COPY pyproject.toml README.md /src/
COPY hpeft_serve /src/hpeft_serve
COPY exporters /src/exporters
COPY deploy/docker/triton_cpu_setup.py /tmp/build/
RUN pip install --no-deps --no-build-isolation /src && python /tmp/build/triton_cpu_setup.py \
 && python -c "import hpeft_serve.serving.runtime, onnxruntime, s3fs; print('runtime ok', onnxruntime.__version__)" \
 && rm -rf /src /tmp/build \
 && useradd --uid 1000 --user-group --no-create-home --shell /usr/sbin/nologin triton-server

# uid 1000 as in the NGC image (k8s/base/triton.yaml: runAsUser 1000); the root filesystem can be read-only
# (compose: read_only) with /tmp and /dev/shm writable. Do not publish 8000/8001: the gateway is the public face.
USER 1000
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=3s --start-period=180s \
  CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2)"
CMD ["/bin/sh", "-c", "exec tritonserver --model-repository=/models --model-control-mode=explicit \
'--load-model=*' --disable-auto-complete-config --http-port=8000 --grpc-port=8001 --metrics-port=8002 \
\"--http-restricted-api=model-repository,shared-memory,trace,logging:hpeft-triton-key=${HPEFT_TRITON_KEY:?}\" \
\"--grpc-restricted-protocol=model-repository,shared-memory,trace,logging:hpeft-triton-key=${HPEFT_TRITON_KEY:?}\""]
