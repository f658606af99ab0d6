# The NGC Triton container with what model `hpeft` (Python backend) imports: hpeft_serve's serving runtime,
# numpy, safetensors, onnxruntime-gpu and s3fs, installed into the container's own python3 (the Python
# backend's stub embeds that interpreter). torch is not installed: the serving path never imports it.
# Build from the repository root:  docker build -f deploy/docker/triton.Dockerfile -t hpeft-serve/triton:0.1.0 .
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3
FROM ${TRITON_IMAGE}

ENV PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY deploy/docker/requirements-triton.txt /tmp/requirements-triton.txt
RUN python3 -m pip install -r /tmp/requirements-triton.txt

# the package without its declared dependencies (they include torch and transformers, for training/export)
COPY pyproject.toml README.md /src/
COPY hpeft_serve /src/hpeft_serve
COPY exporters /src/exporters
RUN python3 -m pip install --no-deps /src && rm -rf /src \
 && python3 -c "import hpeft_serve.serving.runtime, onnxruntime, s3fs; print('runtime ok', onnxruntime.__version__)"

# the model repository: mounted at /models (compose) or read from s3:// (Kubernetes: --model-repository).
# compose, Kubernetes and KServe give their own command line; this default one is there for `docker run`, and,
# like theirs, restricts Triton's state-changing APIs to holders of the key: it does not start without
# HPEFT_TRITON_KEY (README.md, "Security"). Do not publish 8000/8001: the gateway is the public face.
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=3s --start-period=180s \
  CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2)"
CMD ["/bin/sh", "-c", "exec tritonserver --model-repository=/models --model-control-mode=explicit \
'--load-model=*' --disable-auto-complete-config --http-port=8000 --grpc-port=8001 --metrics-port=8002 \
\"--http-restricted-api=model-repository,shared-memory,trace,logging:hpeft-triton-key=${HPEFT_TRITON_KEY:?}\" \
\"--grpc-restricted-protocol=model-repository,shared-memory,trace,logging:hpeft-triton-key=${HPEFT_TRITON_KEY:?}\""]
