#!/bin/bash
# $1 = park setting
/work/main/target/release/ringlb-load echo --listen 127.0.0.1:19301 >/dev/null 2>&1 & E=$!
cat > /tmp/pk.toml <<EOT
[server]
listen = ["127.0.0.1:19300"]
shards = 2
park_idle_after = "$1"
[[route]]
path = "/"
upstream = "u"
[upstream.u]
servers = [{ addr = "127.0.0.1:19301" }]
EOT
/work/main/target/release/ringlb run --config /tmp/pk.toml > /tmp/pk.log 2>&1 & R=$!
sleep 0.5
S="^(io_kiocb|kmalloc-(96|192|512)) "
grep -E "$S" /proc/slabinfo | awk '{print $1, $2, $4}' > /tmp/s0; m0=$(grep -E "^(Slab|SUnreclaim):" /proc/meminfo | awk '{print $2}' | tr '\n' ' ')
/work/main/target/release/ringlb-load idle --url ws://127.0.0.1:19300/ --connections 4000 --hold 20s > /tmp/pk-idle.out 2>&1 & L=$!
sleep 16
grep -E "$S" /proc/slabinfo | awk '{print $1, $2, $4}' > /tmp/s1; m1=$(grep -E "^(Slab|SUnreclaim):" /proc/meminfo | awk '{print $2}' | tr '\n' ' ')
echo "park=$1 meminfo Slab,SUnreclaim kB before: $m0 after: $m1"
paste /tmp/s0 /tmp/s1 | awk '{d=$5-$2; printf "  %-12s %7.1f B/session\n", $1, d*$3/4000}'
wait $L; kill $R $E; wait 2>/dev/null
