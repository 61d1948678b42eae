# edge-small: 1 CPU, 512 MiB: a small edge node
docker run \
  --detach \
  --name edgewise \
  --cpus 1 \
  --memory 512m \
  --memory-swap 512m \
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
  edgewise:latest serve
