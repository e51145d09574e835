package main

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/copier"
	"github.com/vmdk2kvm/vmdk2kvm/progress"
	"github.com/vmdk2kvm/vmdk2kvm/sinks"
)

func convertCommand() *cli.Command {
	return &cli.Command{
		Name:      "convert",
		Usage:     "copy a source disk (flattening any snapshot chain) into a new image",
		ArgsUsage: "SRC DST",
		Flags: append(append(sourceFlags(),
			&cli.StringFlag{Name: "output-format", Aliases: []string{"O"}, Usage: "output format (qcow2 where built in, else raw)"},
			&cli.StringFlag{Name: "compress", Usage: "compress output clusters: deflate or zstd (qcow2)"},
			&cli.BoolFlag{Name: "c", Usage: "compress output clusters with deflate, like qemu-img -c (same as --compress=deflate)"},
			&cli.IntFlag{Name: "compress-level", Usage: "compression level (0: default)"},
			&cli.Int64Flag{Name: "cluster-size", Usage: "qcow2 cluster size in bytes (4096 to 2097152)"},
			&cli.StringFlag{Name: "preallocation", Usage: "qcow2 preallocation: off or metadata"},
			&cli.IntFlag{Name: "workers", Usage: "parallel readers (0: automatic)"},
			&cli.BoolFlag{Name: "no-sync", Usage: "do not fsync the output before renaming it into place (like qemu-img convert's default cache=unsafe): faster, but a power cut soon after may lose data"},
			&cli.BoolFlag{Name: "json", Usage: "progress and summary as JSON lines on stdout"},
			&cli.BoolFlag{Name: "fix", Usage: "inspect the guest and run the fixer plugins (into an overlay) before converting"},
		), fixFlags()...),
		Action: func(c *cli.Context) error {
			if c.NArg() != 2 {
				return fmt.Errorf("convert: want SRC and DST, got %d arguments", c.NArg())
			}
			src, dst := c.Args().Get(0), c.Args().Get(1)
			reg, remote := sourcesWithStats(c)
			img, err := reg.Open(c.Context, src, sourceOptions(c))
			if err != nil {
				return err
			}
			defer img.Close()
			var dev block.Device = img
			if c.Bool("fix") {
				if dev, err = fixForConvert(c, img, dst); err != nil {
					return err
				}
				defer dev.Close()
			}
			outs := newSinks()
			format := c.String("output-format")
			if format == "" {
				format = defaultOutputFormat(outs)
			}
			out, err := outs.Create(c.Context, format, dst, img.Size(), sinks.Options{
				ClusterSize:   c.Int64("cluster-size"),
				Compress:      compression(c),
				CompressLevel: c.Int("compress-level"),
				Preallocation: c.String("preallocation"),
				Workers:       c.Int("workers"),
				NoSync:        c.Bool("no-sync"),
			})
			if err != nil {
				return err
			}
			mode := progress.Auto
			if c.Bool("json") {
				mode = progress.JSON
			}
			rep := progress.New(mode, "convert", c.App.Writer)
			st, err := copier.Copy(c.Context, dev, out, copier.Options{
				Workers:      c.Int("workers"),
				TargetZeroed: true,
				Progress:     func(p copier.Progress) { rep.Update(p.Done, p.Total) },
			})
			rep.Done()
			if err == nil {
				err = out.Commit(c.Context)
			}
			if err != nil {
				out.Abort()
				return fmt.Errorf("convert %s to %s: %w", src, dst, err)
			}
			if m := remote(); m != nil && c.Bool("json") {
				json.NewEncoder(c.App.Writer).Encode(map[string]any{"event": "remote", "source": src, "remote": m})
			}
			return printCopySummary(c, "convert", src, dst, format, st)
		},
	}
}

func printCopySummary(c *cli.Context, event, src, dst, format string, st copier.Stats) error {
	secs := st.Elapsed.Seconds()
	rate := 0.0
	if secs > 0 {
		rate = float64(st.Total) / secs
	}
	if c.Bool("json") {
		return json.NewEncoder(c.App.Writer).Encode(map[string]any{
			"event": event, "source": src, "target": dst, "format": format,
			"stats": st, "seconds": secs, "bytes_per_second": int64(rate),
		})
	}
	_, err := fmt.Fprintf(c.App.ErrWriter, "%s: %s -> %s (%s): %s covered, %s read, %s written, %s skipped as holes/zeros in %s (%s/s)\n",
		event, src, dst, format, human(st.Total), human(st.Read), human(st.Written), human(st.Skipped+st.Zeroed),
		st.Elapsed.Round(time.Millisecond), human(int64(rate)))
	return err
}

// compression is --compress, or deflate for -c.
func compression(c *cli.Context) string {
	if comp := c.String("compress"); comp != "" || !c.Bool("c") {
		return comp
	}
	return "deflate"
}
