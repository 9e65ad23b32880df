#!/bin/bash
# usage: hscs.sh ringlb|nginx indep|rl -> per connection: proxy CPU, context switches, from /proc, 20000 full TLS handshakes
target/release/ringlb-load echo --listen 127.0.0.1:27012 >/dev/null 2>&1 & E=$!
if [ $1 = ringlb ]; then target/release/ringlb run --config ringlb-tls.toml >./r1.log 2>&1 & R=$!; sleep 0.5; PIDS=$R
else nginx -c nginx-tls.conf -g 'daemon off;' & R=$!; sleep 0.5; PIDS="$R $(pgrep -P $R)"; fi
cpu() { for p in $PIDS; do awk '{print $14+$15}' /proc/$p/stat; done | awk '{s+=$1} END{print s}'; }
cs() { for p in $PIDS; do for t in /proc/$p/task/*; do awk '/ctxt/{s+=$2} END{print s}' $t/status; done; done | awk '{s+=$1} END{print s}'; }
c0=$(cs); u0=$(cpu)
if [ $2 = indep ]; then bench/indep-load/target/release/indep-load handshake --url wss://127.0.0.1:27023/ --tls --ca ./tls/ca.pem --sni localhost --tls-version 1.3 --tls-cipher TLS13_AES_128_GCM_SHA256 --no-tls-resume --total 20000 --concurrency 50 > ./hs.out 2>&1
else target/release/ringlb-load handshake --url wss://127.0.0.1:27023/ --tls --ca ./tls/ca.pem --sni localhost --tls-version 1.3 --tls-cipher TLS13_AES_128_GCM_SHA256 --no-tls-resume --total 20000 --concurrency 50 > ./hs.out 2>&1; fi
c1=$(cs); u1=$(cpu)
echo "$1 $2: cpu_us/conn=$(( (u1-u0)*10000/20000 )) ctxsw/conn=$(echo "($c1-$c0)/20000" | bc -l | cut -c1-5) | $(head -1 ./hs.out | cut -c1-80)"
kill $R $E; wait 2>/dev/null
