// Command ocibuild writes a container image from a root filesystem directory,
// without a container engine: one layer holding the directory (owned by root,
// with fixed timestamps, so the same files give the same image), the image
// configuration given by the flags, linux/amd64. The output is a
// docker-archive tarball, which `docker load`, `podman load`,
// `kind load image-archive` and `crane push` read.
//
//	ocibuild --rootfs DIR --tag REF --out FILE.tar --entrypoint /usr/local/bin/x \
//	    [--cmd ARG]... [--env K=V]... [--label K=V]... [--user UID:GID] [--workdir DIR]
package main

import (
	"archive/tar"
	"compress/gzip"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// list is a repeatable string flag.
type list []string

func (l *list) String() string     { return strings.Join(*l, ",") }
func (l *list) Set(v string) error { *l = append(*l, v); return nil }

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "ocibuild: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		rootfs, tag, out, user, workdir string
		entrypoint, cmd, env, labels    list
	)
	flag.StringVar(&rootfs, "rootfs", "", "directory that becomes the image's root filesystem")
	flag.StringVar(&tag, "tag", "", "image reference, e.g. ghcr.io/weft-dev/weft-operator:0.1.0")
	flag.StringVar(&out, "out", "", "docker-archive tarball to write")
	flag.StringVar(&user, "user", "", "UID:GID the image runs as")
	flag.StringVar(&workdir, "workdir", "/", "working directory")
	flag.Var(&entrypoint, "entrypoint", "entrypoint argument (repeat for each)")
	flag.Var(&cmd, "cmd", "default argument after the entrypoint (repeat for each)")
	flag.Var(&env, "env", "environment variable K=V (repeat for each)")
	flag.Var(&labels, "label", "label K=V (repeat for each)")
	flag.Parse()
	if rootfs == "" || tag == "" || out == "" || len(entrypoint) == 0 {
		return errors.New("--rootfs, --tag, --out and --entrypoint are required")
	}
	ref, err := name.NewTag(tag)
	if err != nil {
		return fmt.Errorf("--tag %q: %w", tag, err)
	}
	labelMap := map[string]string{}
	for _, l := range labels {
		k, v, ok := strings.Cut(l, "=")
		if !ok {
			return fmt.Errorf("--label %q is not K=V", l)
		}
		labelMap[k] = v
	}
	for _, e := range env {
		if !strings.Contains(e, "=") {
			return fmt.Errorf("--env %q is not K=V", e)
		}
	}
	created := time.Unix(0, 0).UTC()
	layerTar := out + ".layer"
	if err := writeLayer(rootfs, layerTar, created); err != nil {
		return err
	}
	defer os.Remove(layerTar)
	layer, err := tarball.LayerFromFile(layerTar, tarball.WithCompressionLevel(gzip.BestSpeed))
	if err != nil {
		return fmt.Errorf("layer: %w", err)
	}
	base, err := mutate.ConfigFile(empty.Image, &v1.ConfigFile{
		Architecture: "amd64",
		OS:           "linux",
		RootFS:       v1.RootFS{Type: "layers"},
	})
	if err != nil {
		return err
	}
	img, err := mutate.Append(base, mutate.Addendum{
		Layer:   layer,
		History: v1.History{CreatedBy: "weft images/build: ocibuild --rootfs", Created: v1.Time{Time: created}},
	})
	if err != nil {
		return err
	}
	img, err = mutate.Config(img, v1.Config{
		Entrypoint: entrypoint,
		Cmd:        cmd,
		Env:        env,
		User:       user,
		WorkingDir: workdir,
		Labels:     labelMap,
	})
	if err != nil {
		return err
	}
	if img, err = mutate.CreatedAt(img, v1.Time{Time: created}); err != nil {
		return err
	}
	if err := tarball.WriteToFile(out, ref, img); err != nil {
		return fmt.Errorf("writing %s: %w", out, err)
	}
	digest, err := img.Digest()
	if err != nil {
		return err
	}
	fmt.Printf("%s %s %s\n", out, ref.String(), digest.String())
	return nil
}

// writeLayer writes the files under root as an uncompressed tar, in lexical
// order, owned by root, with every timestamp set to created.
func writeLayer(root, path string, created time.Time) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, p)
		if err != nil || rel == "." {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		link := ""
		if info.Mode()&fs.ModeSymlink != 0 {
			if link, err = os.Readlink(p); err != nil {
				return err
			}
		}
		hdr, err := tar.FileInfoHeader(info, link)
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		hdr.Name = filepath.ToSlash(rel)
		if d.IsDir() {
			hdr.Name += "/"
		}
		hdr.Uid, hdr.Gid, hdr.Uname, hdr.Gname = 0, 0, "root", "root"
		hdr.ModTime, hdr.AccessTime, hdr.ChangeTime = created, time.Time{}, time.Time{}
		hdr.Format = tar.FormatPAX
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if !info.Mode().IsRegular() {
			return nil
		}
		src, err := os.Open(p)
		if err != nil {
			return err
		}
		defer src.Close()
		_, err = io.Copy(tw, src)
		return err
	})
	if err != nil {
		return fmt.Errorf("layer from %s: %w", root, err)
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return f.Close()
}
