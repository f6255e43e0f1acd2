# robustgrid on a Ray cluster: the image every KubeRay head and worker pod runs
# (deploy/kuberay-rayjob.yaml) or any Docker host with `ray start`. The Ray base image matches the
# cluster's Ray version and ships CUDA; cells pick the GPU with resources.gpus=1 trainer.device=cuda.
#
#   docker build -t robustgrid:latest .
#   docker run --rm robustgrid:latest robustgrid grid grid=demo --dry-run
ARG RAY_IMAGE=rayproject/ray:2.40.0-py311-gpu
FROM ${RAY_IMAGE}

WORKDIR /home/ray/robustgrid
COPY --chown=ray:users pyproject.toml README.md LICENSE ./
COPY --chown=ray:users harness harness
COPY --chown=ray:users methods methods
COPY --chown=ray:users architectures architectures
COPY --chown=ray:users leaderboard leaderboard
COPY --chown=ray:users configs configs
RUN pip install --no-cache-dir ".[cluster]"

# One data folder at one absolute path in every pod (configs read ROBUSTGRID_DATA), prepared at
# build time for digits (bundled with scikit-learn: no download). Larger datasets: mount a volume
# here, or prepare into it with `robustgrid data prepare cifar10 --source ... --root $ROBUSTGRID_DATA`.
ENV ROBUSTGRID_DATA=/home/ray/data
RUN robustgrid data prepare digits --root "$ROBUSTGRID_DATA"
