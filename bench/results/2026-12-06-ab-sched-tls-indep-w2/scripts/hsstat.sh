#!/bin/bash
# usage: hsstat.sh ringlb|nginx N  -> perf stat tracepoints per connection, TLS handshakes, 2 backends, indep client
cd /tmp/exp
target/release/ringlb-load echo --listen 127.0.0.1:27012 >/dev/null 2>&1 & E=$!; target/release/ringlb-load echo --listen 127.0.0.1:27013 >/dev/null 2>&1 & E2=$!
if [ $1 = ringlb ]; then
sed -e "s/shards = 2/shards = $2/" -e "s/{ addr = \"127.0.0.1:27012\" }/{ addr = \"127.0.0.1:27012\" }, { addr = \"127.0.0.1:27013\" }/" ringlb-tls.toml > hp.toml
target/release/ringlb run --config hp.toml > r1.log 2>&1 & R=$!; sleep 0.7; P=$R
else
sed -e "s/worker_processes 2;/worker_processes $2;/" -e "s/server 127.0.0.1:27012;/server 127.0.0.1:27012; server 127.0.0.1:27013;/" nginx-tls.conf > ngw.conf
nginx -p /tmp/exp/ngt -c /tmp/exp/ngw.conf -e /tmp/exp/ngt/error.log -g 'daemon off;' & R=$!; sleep 0.7; P=$(pgrep -P $R | paste -sd,)
fi
perf stat -x, -e 'sched:sched_switch,syscalls:sys_enter_io_uring_enter,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_epoll_pwait,io_uring:io_uring_complete,io_uring:io_uring_task_add,io_uring:io_uring_local_work_run,io_uring:io_uring_poll_arm,io_uring:io_uring_submit_req,raw_syscalls:sys_enter,task-clock' -p $P -o st.out &
S=$!; sleep 0.3
bench/indep-load/target/release/indep-load handshake --url wss://127.0.0.1:27023/ --tls --ca ./tls/ca.pem --sni localhost --tls-version 1.3 --tls-cipher TLS13_AES_128_GCM_SHA256 --no-tls-resume --total 20000 --concurrency 50 > hs.out 2>&1
kill -INT $S; wait $S
echo "$1 $2: $(head -1 hs.out | cut -c1-60)"
awk -F, '/^[0-9]/{printf "  %-40s %8.2f /conn\n", $3, $1/20000}' st.out
kill $R $E $E2; wait 2>/dev/null
