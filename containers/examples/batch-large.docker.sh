# batch-large: 8 CPU, 8 GiB: large batches, each run on several cores
docker run \
  --detach \
  --name edgewise \
  --cpus 8 \
  --memory 8192m \
  --memory-swap 8192m \
  --read-only \
  --tmpfs /tmp:rw,size=64m,mode=1777 \
  --user 10001:10001 \
  --cap-drop ALL \
  --security-opt no-new-privileges \
  --stop-timeout 15 \
  --publish 8001:8001 \
  --publish 8002:8002 \
  --volume ./model-repo:/models:ro \
  --env EDGEWISE_REPO=/models \
  --env EDGEWISE_PORT=8001 \
  --env EDGEWISE_METRICS_PORT=8002 \
  --env EDGEWISE_INTRA_OP_THREADS=4 \
  --env EDGEWISE_WORKER_THREADS=2 \
  edgewise:latest serve
