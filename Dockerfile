# The operator image. The workload image (training, compression, serving) is
# trainer_image/Dockerfile.
#   docker build -t lepton-operator .
# PYTHON_BASE: any image with python3 and pip on PATH as `python` and `pip` (hack/images.py
# passes one made locally from Debian's packages).
ARG PYTHON_BASE=python:3.12-slim
FROM ${PYTHON_BASE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY trainer_image/lepton_trainer ./trainer_image/lepton_trainer
RUN pip install . && rm -rf /src
RUN useradd --uid 65532 --user-group --no-create-home --shell /usr/sbin/nologin lepton
USER 65532:65532
WORKDIR /
EXPOSE 8000 8080
ENTRYPOINT ["lepton-operator"]
CMD ["--all-namespaces"]
