#!/bin/bash
target/release/ringlb-load echo --listen 127.0.0.1:47012 >/dev/null 2>&1 & E=$!
target/release/ringlb run --config ringlb-tls.toml >./r1.log 2>&1 & R=$!; sleep 0.5
snap() { for t in /proc/$R/task/*; do echo "$(cat $t/comm) $(awk '/^voluntary/{v=$2} /nonvoluntary/{n=$2} END{print v, n}' $t/status) $(awk '{print $14+$15}' $t/stat)"; done; }
snap > ./s0
if [ $1 = indep ]; then bench/indep-load/target/release/indep-load handshake --url wss://127.0.0.1:47023/ --tls --ca ./tls/ca.pem --sni localhost --tls-version 1.3 --tls-cipher TLS13_AES_128_GCM_SHA256 --no-tls-resume --total 20000 --concurrency 50 > ./hs.out 2>&1
else target/release/ringlb-load handshake --url wss://127.0.0.1:47023/ --tls --ca ./tls/ca.pem --sni localhost --tls-version 1.3 --tls-cipher TLS13_AES_128_GCM_SHA256 --no-tls-resume --total 20000 --concurrency 50 > ./hs.out 2>&1; fi
snap > ./s1
paste ./s0 ./s1 | awk '{printf "%-16s vol/conn=%.3f invol/conn=%.3f cpu_us/conn=%.1f\n", $1, ($6-$2)/20000, ($7-$3)/20000, ($8-$4)*10000/20000}'
kill $R $E; wait 2>/dev/null
