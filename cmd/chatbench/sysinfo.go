package main

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// raiseNoFile raises the RLIMIT_NOFILE soft limit to the hard limit: every
// connection is a file descriptor. It returns the limits in force.
func raiseNoFile() (cur, max uint64, err error) {
	var l syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
		return 0, 0, err
	}
	if l.Cur < l.Max {
		want := l
		want.Cur = l.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &want); err != nil {
			return l.Cur, l.Max, err
		}
		l = want
	}
	return l.Cur, l.Max, nil
}

// readRSS returns the resident set size of pid in KiB (VmRSS from
// /proc/<pid>/status).
func readRSS(pid int) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "VmRSS:") {
			continue
		}
		fields := strings.Fields(line[len("VmRSS:"):])
		if len(fields) < 1 {
			break
		}
		kb, err := strconv.ParseInt(fields[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/%d/status: bad VmRSS %q", pid, line)
		}
		return kb, nil
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("/proc/%d/status: no VmRSS", pid)
}

// clockTicks is USER_HZ, the unit of /proc/<pid>/stat times; 100 on every
// Linux architecture Go supports.
const clockTicks = 100

// readCPU returns the user+system CPU time pid has used.
func readCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name, field 2, is in parentheses and may hold spaces.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	fields := strings.Fields(s[i+1:])
	// fields[0] is field 3 (state); utime and stime are fields 14 and 15.
	if len(fields) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	ut, err1 := strconv.ParseInt(fields[11], 10, 64)
	st, err2 := strconv.ParseInt(fields[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	return time.Duration(ut+st) * time.Second / clockTicks, nil
}

// selfCPU returns the user+system CPU time this process has used.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// cpuMeter measures the CPU used by this process and by server pids over an
// interval.
//
// It also samples the servers' VmRSS, so that a phase under overload shows
// whether their memory stays bounded.
type cpuMeter struct {
	pids   []int
	start  time.Time
	self   time.Duration
	server []time.Duration

	rssStart   int64 // KiB, summed over pids
	rssPeak    atomic.Int64
	stopRSS    chan struct{}
	rssSampled sync.WaitGroup
}

// rssEvery is how often server memory is sampled during a phase.
const rssEvery = 250 * time.Millisecond

func startCPU(pids []int) *cpuMeter {
	m := &cpuMeter{pids: pids, start: time.Now(), self: selfCPU(), stopRSS: make(chan struct{})}
	for _, pid := range pids {
		d, _ := readCPU(pid)
		m.server = append(m.server, d)
	}
	if len(pids) > 0 {
		m.rssStart = m.sumRSS()
		m.rssPeak.Store(m.rssStart)
		m.rssSampled.Add(1)
		go m.sampleRSS()
	}
	return m
}

func (m *cpuMeter) sumRSS() int64 {
	var sum int64
	for _, pid := range m.pids {
		kb, _ := readRSS(pid)
		sum += kb
	}
	return sum
}

func (m *cpuMeter) sampleRSS() {
	defer m.rssSampled.Done()
	tick := time.NewTicker(rssEvery)
	defer tick.Stop()
	for {
		select {
		case <-m.stopRSS:
			return
		case <-tick.C:
			if kb := m.sumRSS(); kb > m.rssPeak.Load() {
				m.rssPeak.Store(kb)
			}
		}
	}
}

// cpuUsage is CPU time used over an interval, in seconds, and as cores busy
// on average.
type cpuUsage struct {
	WallSeconds    float64   `json:"wall_seconds"`
	ToolSeconds    float64   `json:"chatbench_cpu_seconds"`
	ToolCores      float64   `json:"chatbench_cores"`
	ServerSeconds  []float64 `json:"server_cpu_seconds,omitempty"` // per -pids entry
	ServerCoresSum float64   `json:"server_cores,omitempty"`
	// Servers' VmRSS, summed over -pids: at the start and the highest sample.
	ServerRSSStartKiB int64 `json:"server_rss_start_kib,omitempty"`
	ServerRSSPeakKiB  int64 `json:"server_rss_peak_kib,omitempty"`
}

func (m *cpuMeter) stop() cpuUsage {
	wall := time.Since(m.start).Seconds()
	u := cpuUsage{WallSeconds: wall, ToolSeconds: (selfCPU() - m.self).Seconds()}
	if len(m.pids) > 0 {
		close(m.stopRSS)
		m.rssSampled.Wait()
		u.ServerRSSStartKiB, u.ServerRSSPeakKiB = m.rssStart, max(m.rssPeak.Load(), m.sumRSS())
	}
	for i, pid := range m.pids {
		d, err := readCPU(pid)
		if err != nil {
			continue
		}
		s := (d - m.server[i]).Seconds()
		u.ServerSeconds = append(u.ServerSeconds, s)
		u.ServerCoresSum += s
	}
	if wall > 0 {
		u.ToolCores = u.ToolSeconds / wall
		u.ServerCoresSum /= wall
	}
	return u
}
